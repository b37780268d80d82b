"""Planning errors that name the resource and the field, and say what would be valid."""


class PlanError(ValueError):
    def __init__(self, resource: str, field: str, message: str):
        self.resource, self.field, self.message = resource, field, message
        super().__init__(f"{resource}: {field}: {message}")
