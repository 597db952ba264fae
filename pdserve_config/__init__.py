"""What configures every pdserve process: the config field of a command-line flag
(`fields.py`) and the gRPC security settings with the interceptors and credentials that
apply them (`security.py`). The lowest layer, beside `pdserve_proto`: the gateway, the
workers, the engine and the command all build their configs from it. Importing the
package imports neither module, so the engine's configs never pull in gRPC."""
