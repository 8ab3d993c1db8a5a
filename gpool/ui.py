"""A sweep's comparison as an MLflow UI view that a link opens: its runs grouped by the swept
factors, with charts of each group's accuracy (mean line, min-max band).

MLflow's runs page keeps a shared view in an experiment tag `mlflow.sharedViewState.<key>`
and opens it from `#/experiments/<id>/runs?viewStateShareKey=<key>`. The tag holds what the
UI's "Share" writes in MLflow 3.17 and 3.18 (neither has an API for it): a JSON envelope
{name, createdAt, updatedAt, state}, the state a JSON string of search facets (searchFilter,
...) and UI state (selectedColumns, groupBy, compareRunCharts, ...); the UI fills in its own
defaults for any key left out.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from urllib.parse import urlencode, urlparse

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from gpool.config import GROUPS
from gpool.store import redact

SHARED_VIEW_TAG = "mlflow.sharedViewState."
LOCAL_UI = "http://127.0.0.1:5000"
# The UI opens on its GenAI sidebar unless told the experiment is model training.
WORKFLOW = {"workflowType": "machine_learning"}
CHARTED = ("val_acc", "train_acc")
CHART_SECTION = "Model metrics"  # the UI's section for metrics without a "/" prefix


def column(kind: str, key: str) -> str:
    """A runs-table column id as the UI writes it, e.g. params.`optimizer.lr`."""
    return f"{kind}.`{key}`"


def group_key(name: str) -> dict[str, str]:
    """Config group choices are tags (`pool`); any other factor is a param."""
    return {"mode": "tag" if name in GROUPS else "param", "groupByData": name}


def line_chart(metric: str, section: str, y_range: tuple[float, float] | None = None) -> dict:
    """A line chart of one metric by epoch (grouped runs: the mean and a min-max band);
    given `y_range`, its y axis spans that instead of fitting every epoch from 0."""
    chart = {
        "uuid": uuid.uuid4().hex,
        "type": "LINE",
        "metricKey": metric,
        "selectedMetricKeys": [metric],
        "displayName": metric,
        "metricSectionId": section,
        "runsCountToCompare": 100,
        "deleted": False,
        "isGenerated": False,
        "xAxisKey": "step",
        "xAxisScaleType": "linear",
        "scaleType": "linear",
        "yAxisKey": "metric",
        "yAxisExpressions": [],
        "lineSmoothness": 0,
        "ignoreOutliers": False,
        "useGlobalXaxisKey": True,
        "useGlobalLineSmoothing": True,
    }
    if y_range is not None:
        chart["range"] = {"xMin": None, "xMax": None, "yMin": y_range[0], "yMax": y_range[1]}
    return chart


def view_state(
    parent_id: str, factors: Sequence[str], final: tuple[float, float] | None = None
) -> dict:
    """The sweep's child runs, grouped by `factors` (seeds averaged), with columns for the
    factors and the final val_acc, and val_acc / train_acc charts first; given the range
    the groups' final val_acc lies in, first a val_acc chart zoomed to it, where a gap of
    half a point shows (on the axis from 0 the group lines lie on top of each other)."""
    section = uuid.uuid4().hex
    charts = [line_chart(m, section) for m in CHARTED]
    if final is not None:
        charts.insert(0, line_chart(CHARTED[0], section, final))
    columns = [column("attributes", "Dataset"), column("attributes", "Models")]
    columns += [column("tags" if f in GROUPS else "params", f) for f in factors]
    columns += [column("params", "seed"), column("metrics", "val_acc")]
    return {
        "searchFilter": f"tags.`mlflow.parentRunId` = '{parent_id}'",
        "selectedColumns": columns,
        "groupBy": {"aggregateFunction": "average", "groupByKeys": list(map(group_key, factors))},
        "runsHiddenMode": "SHOW_ALL",
        "useGroupedValuesInCharts": True,
        "compareRunCharts": charts,
        "compareRunSections": [
            {
                "uuid": section,
                "name": CHART_SECTION,
                "display": True,
                "isReordered": True,  # the UI appends its other charts after these
                "deleted": False,
                "isGenerated": True,
            }
        ],
    }


def ui_address(tracking_uri: str) -> tuple[str, str | None]:
    """Where the UI of this store is served, and the command that serves it when that is
    not the store itself (a database or folder: `mlflow ui` on its default address)."""
    if urlparse(tracking_uri).scheme in ("http", "https"):
        return redact(tracking_uri).rstrip("/"), None
    return LOCAL_UI, f"mlflow ui --backend-store-uri {tracking_uri}"


def page_url(tracking_uri: str, route: str, **query: str) -> str:
    """A UI page's URL; every one carries WORKFLOW so that the model-training pages open."""
    return f"{ui_address(tracking_uri)[0]}/#/{route}?{urlencode({**query, **WORKFLOW})}"


def share_comparison(
    client: MlflowClient,
    parent: Run,
    factors: Sequence[str],
    final: tuple[float, float] | None = None,
) -> str:
    """Write the sweep's view (one per sweep: its key is the parent run's id, so a rerun
    replaces it) and return the URL that opens it on the charts (`final`: see view_state)."""
    info = parent.info
    now = int(time.time() * 1000)
    envelope = {
        "name": info.run_name or info.run_id,
        "createdAt": now,
        "updatedAt": now,
        "state": json.dumps(view_state(info.run_id, factors, final)),
    }
    client.set_experiment_tag(
        info.experiment_id, SHARED_VIEW_TAG + info.run_id, json.dumps(envelope)
    )
    route = f"experiments/{info.experiment_id}/runs"
    return page_url(
        client.tracking_uri, route, viewStateShareKey=info.run_id, compareRunsMode="CHART"
    )


def ui_pointer(tracking_uri: str, url: str) -> str:
    """What gpool prints about a view: its URL, and how to serve the UI where needed."""
    serve = ui_address(tracking_uri)[1]
    return f"The comparison in the MLflow UI: {url}" + (
        f"\n(serve it with `{serve}`)" if serve else ""
    )
