"""Configuration: service settings (environment) and feed properties (platform or embedded TOML)."""
