"""The demo's own steps that are not `pipeline` commands: the DVC stage predict_demo, and what `make demo` prints at the end."""
