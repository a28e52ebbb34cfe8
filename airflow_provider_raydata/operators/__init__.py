"""The Ray Data operators (Airflow worker)."""

from airflow_provider_raydata.operators.raydata import (
    RayDataExtractOperator,
    RayDataLoadOperator,
    RayDataQualityOperator,
    RayDataStagingCleanupOperator,
    RayDataTransformOperator,
)

__all__ = [
    "RayDataExtractOperator",
    "RayDataTransformOperator",
    "RayDataQualityOperator",
    "RayDataLoadOperator",
    "RayDataStagingCleanupOperator",
]
