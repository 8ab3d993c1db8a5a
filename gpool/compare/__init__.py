"""`gpool.compare`: the comparison of a sweep's (or an experiment's) runs, in rooms along its
seams: `runs` selects and groups runs from a store, `verdict` judges plain arrays (a
PairResult per pair), `render` writes the tables and figure rows, `comparison` puts them
together, `publish` writes files and the sweep's MLflow run, `cli` is the command
(`python -m gpool.compare`). Importing the package imports none of them."""
