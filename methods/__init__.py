"""The federated methods: one package each, registered here, one line each, in the order the benchmark plans
its runs in and the tests parametrize in (as peft's tuners/__init__.py lists its tuners). Importing `methods`
fills the registry (common/methods.py, the mechanism, which imports nothing of this package); the apps, the
scripts, the benchmark and tests/conftest.py import it.

Each method's spec (its rates, its sections, its facts) is in its package's __init__.py, and FedTT's package
declares FedTT+ beside it. Learning rates ("train.lr" = "auto") are Adam's rate of each first-order method,
chosen by short single-client probes; the zero-order methods step with zo.lr and never read train.lr.
Adding a method: docs/development.md, "How to add a method".
"""

from common.methods import register_package
from methods import fedavg, fedavg_lora, fedkrso, fedkseed, fedspzo, fedtt

register_package(fedkrso)
register_package(fedavg)
register_package(fedspzo)
register_package(fedkseed)
register_package(fedtt)  # FedTT and FedTT+
register_package(fedavg_lora)
