"""The experiment harness: data sets, the CIFAR model builders, checkpoints, training, evaluation,
the paper's protocol, results files and CLI helpers. It uses the library core; the core never
imports it. Importing this package registers the CIFAR builders for load_pruned."""
from . import models  # noqa: F401  (registers vgg11_bn / resnet18 with serialization.register_builder)
