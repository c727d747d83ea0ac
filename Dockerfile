# Trousseau KMS plugin image: the last step of `npm run image` (deploy/image/build.sh),
# which runs it with `buildah bud` after staging two folders in dist/image/work/:
#   base/  the Node 24 binary of the npm `node` package, the shared libraries ldd lists
#          for it and for the native addons, Debian's CA roots, /etc/passwd and
#          /etc/group with uid 10001, /tmp. No shell, no package manager.
#   app/   /app: the production dependencies (npm ci --omit=dev on the host, trimmed by
#          deploy/image/trim.sh), src/, bin/, package.json, build-info.json.
# FROM scratch: nothing is pulled. With Docker, the same layout:
#   bash deploy/image/build.sh --stage-only
#   docker build -f Dockerfile -t registry.example.com/trousseau:0.1.0 dist/image/work
# (build.sh also sets the OCI labels and the reproducible timestamps; see docs/deploy.md).
#
# The TypeScript sources run as they are on Node 24 (type stripping; /app/src is not
# under node_modules, where Node refuses to strip types). No compile step means no
# dist/ to keep in sync with src/, and the .proto files under src/kms/proto are found
# next to the code that loads them, exactly as in a checkout and in the tests.

FROM scratch
COPY base/ /
COPY app/ /
ENV PATH=/usr/local/bin:/usr/bin:/bin
ENV NODE_ENV=production
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
# A young generation of 8 MiB semi-spaces instead of V8's up to 64 MiB: scavenge pauses
# stay at a few milliseconds instead of 15-25 ms, which took the benchmark's Decrypt
# p99 from ~20 ms to ~13 ms and RSS under load from ~340 to ~250 MiB
# (docs/performance.md). bench/ runs the plugin with exactly these options.
ENV NODE_OPTIONS="--max-semi-space-size=8"
WORKDIR /app
# Numeric, so that Kubernetes' runAsNonRoot can check it; the manifests in deploy/ use
# the same uid and gid (the socket's group), from deploy/image/settings.json.
USER 10001:10001
ENTRYPOINT ["node", "/app/bin/trousseau.js"]
CMD ["serve", "--config", "/etc/trousseau/config.yaml"]
