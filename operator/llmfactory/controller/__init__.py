"""The operator: kopf handlers that reconcile the four kinds into Jobs (llmfactory operator)."""
