#!/usr/bin/env bash
# make demo: sample data for three days, the daily batch DAG for one of them on an embedded
# local Ray (no connection configured), then a summary of what each stage did.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO="$PWD/.demo"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$DEMO/airflow}"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_FOLDER="$PWD/dags"
export RAYDATA_SOURCE_URI="$DEMO/source" RAYDATA_LAKE_URI="$DEMO/lake"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
DATE="${DEMO_DATE:-2024-01-02}"
PATH="$PWD/.venv/bin:$PATH"

python scripts/sample_data.py "$RAYDATA_SOURCE_URI" 2024-01-01 2024-01-03
airflow db migrate > "$DEMO/db-migrate.log" 2>&1
echo "Running raydata_daily_batch for $DATE (log: $DEMO/dags-test.log) ..."
status=0
airflow dags test raydata_daily_batch "$DATE" > "$DEMO/dags-test.log" 2>&1 || status=$?
python scripts/demo_summary.py raydata_daily_batch || status=$?
if [ "$status" -ne 0 ]; then
  echo "The run failed: see $DEMO/dags-test.log" >&2
  grep -E "AirflowException|Error" "$DEMO/dags-test.log" | tail -5 >&2 || true
fi
exit "$status"
