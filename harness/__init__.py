"""What the tests, the benchmark and the scripts share for driving the system in one process: stand-ins for
Flower's runtime (`fakes`: a Grid, a node's reply), tiny real models (`tiny`) and the count of how often a round
reads each reply (`readcount`). It imports from common/,
methods/ and server_app/ and nothing from tests/, bench/ or scripts/, so those three import it and not each
other's helpers (tests/test_layers.py checks the directions)."""
