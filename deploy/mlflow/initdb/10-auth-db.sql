-- Runs once, when the postgres volume is first initialised: a separate database for the
-- basic-auth app's users and permissions, beside the tracking store's `mlflow` database.
CREATE DATABASE mlflow_auth OWNER mlflow;
