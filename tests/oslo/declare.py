"""The oslo.messaging services of a cell declaring their queues before cellhost.

    declare.py URL CELL [OSLO ARGS]

As a deployment that ran nova-cells leaves a cell's broker: an RPC server per
intercell topic (`cells.intercell.{targeted,broadcast,response}`) starts and
stops, leaving its queues `T`, `T.<server>`, `T_fanout_<hex>` and exchanges
(none is auto-delete); then an RPC client calls `get_host_uptime` on
`cells.local` (worker.py must be serving it), which leaves its reply queue
`reply_<hex>`. Prints `ready` once all of it is declared. OSLO ARGS go to
oslo.config, e.g. `--config-file deployment.conf` with an
`[oslo_messaging_rabbit]` section, so the declarations follow its options.
"""
import sys

from oslo_config import cfg
import oslo_messaging as messaging


class Nothing(object):
    pass


def main():
    url, cell = sys.argv[1], sys.argv[2]
    messaging.set_transport_defaults("nova")
    conf = cfg.CONF
    conf(sys.argv[3:], project="cellhost-interop")
    transport = messaging.get_rpc_transport(conf, url=url)
    for kind in ("targeted", "broadcast", "response"):
        target = messaging.Target(topic="cells.intercell.%s" % kind, server="nova-cells-%s" % cell)
        server = messaging.get_rpc_server(transport, target, [Nothing()], executor="threading")
        # start() declares the consumers before it returns.
        server.start()
        server.stop()
        server.wait()
    client = messaging.get_rpc_client(transport, messaging.Target(topic="cells.local"))
    client.prepare(timeout=20).call({}, "get_host_uptime")
    print("ready", flush=True)
    transport.cleanup()


if __name__ == "__main__":
    main()
