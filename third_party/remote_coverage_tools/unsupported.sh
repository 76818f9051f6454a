#!/bin/sh
echo "coverage is not supported by the lmps build" >&2
exit 1
