"""The five performance presets, shipped as YAML files inside the package."""
