"""Fed-LSCL that misbehaves once per marker file, to test the Ray executor's retries and Ctrl-C.

``FCL_TEST_DIE_ONCE=FILE``: client 0 kills its process (``os._exit``) when it starts task 1 (after the
checkpoint of task 0 is written), the first time only: the file is created before dying, and a retry finds
it. ``FCL_TEST_HANG=FILE``: client 0 creates the file and sleeps when it starts task 1 (the test interrupts
it there). Unset: a plain Fed-LSCL run.
"""

import os
import time
from pathlib import Path

from fcl_bench.methods.fedlscl import FedLSCL, FedLSCLClient


class FaultyClient(FedLSCLClient):
    def start_task(self, task):
        if self.id == 0 and task.index == 1:
            die = os.environ.get("FCL_TEST_DIE_ONCE")
            if die and not Path(die).exists():
                Path(die).write_text(str(os.getpid()))
                os._exit(137)
            hang = os.environ.get("FCL_TEST_HANG")
            if hang:
                Path(hang).write_text(str(os.getpid()))
                time.sleep(600)
        super().start_task(task)


class Faulty(FedLSCL):
    name = "faulty"

    def client(self, client_id, env):
        return FaultyClient(self.config, env)
