"""Pipeline stages: one module each, with one ``run(config)`` entry point."""
