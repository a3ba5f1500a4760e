"""Pipeline stages as plain functions: inputs in storage -> outputs in storage.

Nothing here imports the database layer. Heavy imports (torch, ray) stay inside the modules that
need them, so importing `workers.storage` from the CLI's fast paths stays cheap.
"""
