"""Every name gpool writes into a store, a folder or the environment, defined once: the
MLflow tags of runs and sweeps, the environment variables that carry a sweep to its jobs,
and the artifacts a run and a comparison log. Anyone who can write to a run can write its
tags and artifacts: gpool reads them as claims to check, never as paths to follow.
tests/test_names.py finds any of these spelled again elsewhere."""

# --- tags of a job's run ----------------------------------------------------------------
#: The config hash (gpool.resume.config_hash): how a rerun finds the run of its config.
HASH_TAG = "gpool.config_hash"
#: The path of the run's latest checkpoint: for people, never read back.
CHECKPOINT_TAG = "gpool.checkpoint"
#: Seconds spent in MLflow calls so far, over every session that trained the run.
SECONDS_TAG = "gpool.mlflow_seconds"
#: Why the run's steps could not be captured as a CUDA graph; they ran eagerly.
EAGER_TAG = "gpool.eager_because"
#: How a run ended badly: its exception's type and message.
FAILURE_TAG = "failure"
#: The command line's overrides of a run, or of a sweep.
OVERRIDES_TAG = "overrides"
#: How the run was trained: on which device, with how many torch threads, in which fused
#: group of how many members (bit for bit reproducible only alike).
DEVICE_TAG = "gpool.device"
THREADS_TAG = "gpool.threads"
FUSED_GROUP_TAG = "gpool.fused_group"
FUSED_SIZE_TAG = "gpool.fused_size"
#: Where the process of a RUNNING run lives: what gpool.resume.is_alive checks.
HOST_TAG = "gpool.host"
PID_TAG = "gpool.pid"
SLURM_JOB_TAG = "gpool.slurm_job"

# --- tags of a sweep's parent run ---------------------------------------------------------
#: Marks a sweep's parent run (value SWEEP_ROLE).
ROLE_TAG = "gpool.role"
SWEEP_ROLE = "sweep"
#: What identifies "the same sweep" when it is run again.
SWEEP_KEY_TAG = "gpool.sweep_key"
#: The sweep's output folder.
SWEEP_DIR_TAG = "sweep_dir"
#: How many jobs the sweep has (basic sweeper only).
EXPECTED_JOBS_TAG = "gpool.jobs"
#: One per job: gpool.job.<config hash> = the job's run id, also for a job that finished
#: in an earlier sweep and was skipped.
JOB_TAG_PREFIX = "gpool.job."
#: A decide sweep's outcome: whether, and after how many seeds, it was decided.
DECIDED_TAG = "gpool.decided"
#: A decide sweep's plan: its looks, spending, futility threshold and margin.
PLAN_TAG = "gpool.plan"

# --- the MLflow dataset inputs of a job's run (their context) ---------------------------
TRAIN_CONTEXT, VAL_CONTEXT, TEST_CONTEXT = "training", "validation", "testing"
#: The context of each split a run scores (predictions/<split>.npy).
SPLIT_CONTEXTS = {"val": VAL_CONTEXT, "test": TEST_CONTEXT}

# --- environment ------------------------------------------------------------------------
#: How a multirun's jobs, in this process or in launcher-started ones, find their parent.
PARENT_RUN_ENV = "GPOOL_PARENT_RUN_ID"
#: ... and the keys the sweep varies (space-separated), which their run names carry.
SWEPT_KEYS_ENV = "GPOOL_SWEPT_KEYS"
#: The sweep's launching process, so that job processes notice when it dies (SIGKILL).
LAUNCHER_PID_ENV = "GPOOL_LAUNCHER_PID"


# --- artifacts of a job's run -------------------------------------------------------------
#: Per split a run scored, predictions/<split>.npy (gpool.predictions).
PREDICTIONS_DIR = "predictions"
#: The trained weights (a state_dict), the figures, the confusion matrix, the config.
WEIGHTS_FILE = "model.pt"
CURVES_FILE = "curves.png"
CLASS_MAPS_FILE = "class_maps.png"
CONFUSION_FILE = "confusion_matrix.png"
CONFUSION_REPORT = "confusion_matrix.json"
CONFIG_FILE = "config.yaml"
HYDRA_DIR = "hydra"
#: The image key of the class maps logged every few epochs (the run page's slider).
CLASS_MAPS_KEY = "class_maps"
#: The MLflow logged model's name.
MODEL_NAME = "model"

# --- artifacts of a sweep's comparison ----------------------------------------------------
COMPARISON_DIR = "comparison"
REPORT_FILE = "comparison.md"
TABLE_FILE = "comparison.csv"
COMPARISON_CURVES_FILE = "comparison.png"
FOREST_FILE = "forest.png"
PAIRWISE_FILE = "pairwise.png"
ACROSS_FILE = "across_tasks.png"
PAIR_MAPS_FILE = "class_maps_pair.png"
SHIFT_FILE = "shift.png"
