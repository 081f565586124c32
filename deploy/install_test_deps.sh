#!/usr/bin/env bash
# Best-effort install of system packages the tests use: OpenSSH's server (the test that launches a
# worker over SSH) and Chromium (the web page test, headless, driven by Playwright). Where they
# cannot be installed (not root, no apt-get), those tests skip and say why.
set -u
missing=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") \
    >/dev/null 2>&1 || echo "note: could not install ${missing[*]}; the tests that need them will skip"
fi
exit 0
