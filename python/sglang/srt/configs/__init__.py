"""Model and load configuration."""
