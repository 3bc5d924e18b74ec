# One image for every doai part; compose.yaml picks the command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY contracts contracts
COPY services services
COPY runtime runtime
COPY infra infra
COPY recipes recipes
RUN pip install --no-cache-dir .
ENTRYPOINT ["doai"]
