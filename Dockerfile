# One image for the four services and the simulator: `billing <part>` picks the part.
FROM python:3.11-slim
WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
RUN pip install --no-cache-dir -r requirements.lock
COPY shared shared
COPY services services
COPY simulator simulator
COPY cli cli
RUN pip install --no-cache-dir --no-deps . && useradd --system billing
USER billing
ENTRYPOINT ["billing"]
