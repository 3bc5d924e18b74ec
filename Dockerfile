# One image for every central doai part (and the node/simulator of compose); compose.yaml picks the command.
# The recipes, NATS config and migrations travel inside the wheel as package data.
FROM python:3.11-slim
WORKDIR /app
COPY . /src
RUN pip install --no-cache-dir "/src[server,node,supabase,uvloop]" && rm -rf /src
ENTRYPOINT ["doai"]
