"""The Flower App that `flwr run` ships to a SuperLink: fcl-bench's generic apps (fcl-bench must be installed
where the SuperLink and the SuperNodes run)."""

from fcl_bench.flower import client_app as _client_app
from fcl_bench.flower import server as _server

client = _client_app.app
server = _server.deployment_server_app()
