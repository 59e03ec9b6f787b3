#!/bin/sh
# The "app" of the build matrix: says what it found on the base it runs on.
echo "base: $1"
echo "flavor: $(cat /etc/flavor 2>/dev/null || echo plain)"
echo "user: $(id -un)"
echo "tools: $(ls /opt/tools 2>/dev/null | tr '\n' ' ')"
