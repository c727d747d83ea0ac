# Trousseau KMS plugin image. Docker cannot run on the machines this project is
# developed and tested on, so this file is kept small and conventional; see
# docs/deploy.md for what is and is not verified.
#
# The TypeScript sources run as they are on Node 24 (type stripping; src/ is not under
# node_modules, where Node refuses to strip types). No compile step means no dist/ to
# keep in sync with src/, and the .proto files under src/kms/proto are found next to the
# code that loads them, exactly as in a checkout and in the tests.
#
#   docker build -t registry.example.com/trousseau:0.1.0 .

FROM node:24-slim AS deps
WORKDIR /app
COPY package.json package-lock.json ./
# Production dependencies only (the `node` package that pins Node 24 for checkouts is a
# dev dependency; the image has its own). --ignore-scripts: nothing needs an install
# script at run time.
RUN npm ci --omit=dev --ignore-scripts && npm cache clean --force

FROM node:24-slim
ENV NODE_ENV=production
# A young generation of 8 MiB semi-spaces instead of V8's up to 64 MiB: scavenge pauses
# stay at a few milliseconds instead of 15-25 ms, which took the benchmark's Decrypt
# p99 from ~20 ms to ~13 ms and RSS under load from ~340 to ~250 MiB
# (docs/performance.md). bench/ runs the plugin with exactly these options.
ENV NODE_OPTIONS="--max-semi-space-size=8"
WORKDIR /app
COPY --from=deps /app/node_modules ./node_modules
COPY package.json ./
COPY bin ./bin
COPY src ./src
# Numeric, so that Kubernetes' runAsNonRoot can check it; the manifests in deploy/ use
# the same uid and gid (the socket's group).
USER 10001:10001
ENTRYPOINT ["node", "/app/bin/trousseau.js"]
CMD ["serve", "--config", "/etc/trousseau/config.yaml"]
