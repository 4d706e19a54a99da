"""Fed-LSCL that kills its own process (``os._exit``) at a chosen point, to test checkpoints and resume.

``FCL_TEST_KILL=start:T`` dies when client 0 starts task T (after the checkpoint of task T-1 is written);
``FCL_TEST_KILL=round:T:R:C`` dies when client C trains round R of task T (inside a task). Unset: a plain
Fed-LSCL run.
"""

import os

from fcl_bench.methods.fedlscl import FedLSCL, FedLSCLClient


def _die_if(point: str) -> None:
    if os.environ.get("FCL_TEST_KILL") == point:
        os._exit(137)


class KillableClient(FedLSCLClient):
    def start_task(self, task):
        if self.id == 0:
            _die_if(f"start:{task.index}")
        super().start_task(task)

    def train_round(self, info):
        _die_if(f"round:{info.task}:{info.round}:{self.id}")
        return super().train_round(info)


class Killable(FedLSCL):
    name = "killable"

    def client(self, client_id, env):
        return KillableClient(self.config, env)
