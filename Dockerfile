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
