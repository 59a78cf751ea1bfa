"""Backend adapters: one module per upstream protocol, registered in `registry`."""
