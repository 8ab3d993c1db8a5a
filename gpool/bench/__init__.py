"""`gpool.bench`: the measurements behind gpool's performance claims, apart from the
product's rooms: `cli` is the command (`python -m gpool.bench`), `loops` the training
loops it times, `server` a local MLflow server and simulated runs for timing comparisons
over it (the test suite starts its servers with it too), `profile` one step's operator
counts."""
