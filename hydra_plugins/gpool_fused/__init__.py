"""gpool's launcher plugins, found by Hydra's plugin discovery (`hydra_plugins` namespace)."""
