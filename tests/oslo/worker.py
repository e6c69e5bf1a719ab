"""A cell's application as a real oslo.messaging RPC server.

    worker.py URL CELL [DELAY_SECONDS] [OSLO ARGS]

Serves topic `cells.local` on the given transport URL and prints one JSON line
per message it processed, after a first line `ready`. With a delay, every
method first sleeps that long (a slow or hung worker). Arguments after that
go to oslo.config, e.g. `--config-file deployment.conf` holding an
`[oslo_messaging_rabbit]` section. Used by the cellhost interop tests; runs
until its standard input closes.
"""
import json
import sys
import threading
import time

from oslo_config import cfg
import oslo_messaging as messaging


class Endpoint(object):
    def __init__(self, cell, delay):
        self.cell = cell
        self.delay = delay

    def _record(self, method, ctxt, kwargs):
        print(json.dumps({"method": method, "ctxt": ctxt, "kwargs": kwargs}), flush=True)
        if self.delay:
            time.sleep(self.delay)

    def service_get_all(self, ctxt, **kwargs):
        self._record("service_get_all", ctxt, kwargs)
        return "services of %s" % self.cell

    def get_host_uptime(self, ctxt, **kwargs):
        self._record("get_host_uptime", ctxt, kwargs)
        return "uptime of %s" % self.cell

    def reboot_instance(self, ctxt, **kwargs):
        self._record("reboot_instance", ctxt, kwargs)

    def explode(self, ctxt, **kwargs):
        self._record("explode", ctxt, kwargs)
        raise ValueError("boom in %s" % self.cell)


def main():
    url, cell = sys.argv[1], sys.argv[2]
    rest = sys.argv[3:]
    delay = 0.0
    if rest and not rest[0].startswith("-"):
        delay = float(rest.pop(0))
    messaging.set_transport_defaults("nova")
    conf = cfg.CONF
    conf(rest, project="cellhost-interop")
    transport = messaging.get_rpc_transport(conf, url=url)
    target = messaging.Target(topic="cells.local", server="w-%s" % cell)
    server = messaging.get_rpc_server(transport, target, [Endpoint(cell, delay)], executor="threading")
    server.start()
    print("ready", flush=True)
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait()
    server.stop()
    server.wait()


if __name__ == "__main__":
    main()
