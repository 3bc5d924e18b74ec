"""doai's services: backend, node agent, aggregator and the vendor simulator."""
