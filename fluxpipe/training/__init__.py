"""The training engine and what it needs: optimizers, schedulers, weights, state, logs, monitors, EMA."""
