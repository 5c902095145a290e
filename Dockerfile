# The project's services (router, inbox, CLI) for users with Docker; see docker-compose.yml.
FROM python:3.11-slim
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends npm && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir . && referral-broker inbox setup || true
ENV REFERRAL_BROKER_DATA_DIR=/data
VOLUME /data
ENTRYPOINT ["referral-broker"]
