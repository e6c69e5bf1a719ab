"""An application sending into a cell with a real oslo.messaging RPC client.

    client.py URL call|cast MESSAGE_TYPE CELLS_MESSAGE_JSON [OSLO ARGS]

Casts or calls `process_message(message=...)` on `cells.intercell.<type>`,
as nova-cells' rpc driver does, and for a call prints the result as JSON. OSLO ARGS go to oslo.config, e.g.
`--config-file deployment.conf` with an `[oslo_messaging_rabbit]` section.
"""
import json
import sys

from oslo_config import cfg
import oslo_messaging as messaging


def main():
    url, mode, message_type, message = sys.argv[1:5]
    messaging.set_transport_defaults("nova")
    conf = cfg.CONF
    conf(sys.argv[5:], project="cellhost-interop")
    transport = messaging.get_rpc_transport(conf, url=url)
    target = messaging.Target(topic="cells.intercell.%s" % message_type)
    client = messaging.get_rpc_client(transport, target)
    ctxt = json.loads(message)["ctxt"]
    if mode == "call":
        result = client.prepare(timeout=20).call(ctxt, "process_message", message=message)
        print(json.dumps(result), flush=True)
    else:
        client.cast(ctxt, "process_message", message=message)
    transport.cleanup()


if __name__ == "__main__":
    main()
