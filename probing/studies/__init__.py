"""Optuna searches and their storages, and MDL (the online code). Imports the stages before it."""
