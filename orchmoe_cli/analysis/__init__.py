"""Reading results: routing statistics, reports and plots, the adaptation report, paired bootstrap and
terminal tables. Pure functions over what the core produced, so the numbers are testable without a model."""
