# Sourced (POSIX sh) by the Dockerfiles' build stages before `pip install`, after
#   COPY docker/ca/ /tmp/ca/   and   COPY docker/wheelhouse/ /tmp/wheelhouse/
# Both directories hold only a README unless the build host filled them (both are git-ignored).
# - docker/ca/*.crt: extra CA certificates (a proxy that re-signs TLS); pip trusts the system
#   bundle plus them. Only this build stage sees them.
# - docker/wheelhouse/*.whl (make wheelhouse): install from there only, no package index (the CPU
#   torch wheel, air-gapped builds). A missing wheel then fails the build instead of fetching it.
if ls /tmp/ca/*.crt >/dev/null 2>&1; then
  # The system bundle (when the base has one) plus the extra certificates.
  cat $(ls /etc/ssl/certs/ca-certificates.crt 2>/dev/null) /tmp/ca/*.crt > /tmp/ca-bundle.pem
  export PIP_CERT=/tmp/ca-bundle.pem
  echo "pip-env: trusting $(ls /tmp/ca/*.crt | wc -l) extra CA file(s)"
fi
if ls /tmp/wheelhouse/*.whl >/dev/null 2>&1; then
  export PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/wheelhouse
  echo "pip-env: installing from the wheelhouse ($(ls /tmp/wheelhouse/*.whl | wc -l) wheels), no index"
else
  echo "pip-env: no wheelhouse, installing from the package index"
fi
