"""Print what the newest run of a DAG did, from the XComs in Airflow's database."""

from __future__ import annotations

import sys

from airflow.models.dagrun import DagRun
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session
from sqlalchemy import select


def main(dag_id: str) -> int:
    with create_session() as session:
        run = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).limit(1)).first()
        if run is None:
            print(f"No run of {dag_id} found")
            return 1
        rows = session.scalars(
            select(XComModel).where(XComModel.dag_id == dag_id, XComModel.run_id == run.run_id)
        ).all()
        xcoms = {(x.task_id, x.key): XComModel.deserialize_value(x) for x in rows}
    print(f"\n{dag_id}  run {run.run_id}  state {run.state}")
    print(f"{'task':<20} {'rows in':>9} {'rows out':>9} {'cluster s':>10}")
    for (task_id, key), metrics in sorted(xcoms.items()):
        if key == "metrics":
            rows_in = "-" if metrics["rows_in"] is None else metrics["rows_in"]
            print(f"{task_id:<20} {rows_in:>9} {metrics['rows_out']:>9} {metrics['seconds']:>10.2f}")
    for (task_id, key), report in xcoms.items():
        if key == "quality_report":
            verdict = "PASSED" if report["passed"] else "FAILED"
            print(
                f"\nQuality ({task_id}): {verdict}, {len(report['checks']) - report['failed']}/"
                f"{len(report['checks'])} checks passed on {report['num_rows']} rows"
            )
            for check in report["checks"]:
                print(f"  {'ok  ' if check['passed'] else 'FAIL'} {check['name']}: {check['value']}")
    for (task_id, key), load in xcoms.items():
        if key == "return_value" and isinstance(load, dict) and "destination" in load:
            print(f"\nOutput ({task_id}): {load['rows_written']} rows in {load['destination']}")
            for partition in load["partitions"]:
                print(f"  {load['destination']}/{partition}/")
    return 0 if run.state == "success" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "raydata_daily_batch"))
