"""llmfactory control plane: API models, planner, local runner, CLI. Never imports torch."""

GROUP = "llmfactory.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
