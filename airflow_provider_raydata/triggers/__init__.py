from airflow_provider_raydata.triggers.raydata import RayDataStageTrigger

__all__ = ["RayDataStageTrigger"]
