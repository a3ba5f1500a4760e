"""The control plane: configuration, the run store, the dispatcher and the `charforge` CLI."""
