from . import functional  # noqa: F401


def __getattr__(name):
    raise AttributeError(f"torchvision stub: transforms.{name} is not available")
