"""r1kit.v1 wire format: r1kit.proto and the modules generated from it by scripts/gen_proto.sh."""
