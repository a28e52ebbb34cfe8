"""Airflow worker side: ``RayHook`` (the Ray cluster) and the warehouses' and object stores'
Airflow connections turned into plain parameters for the cluster, one module per system."""
