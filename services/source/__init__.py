"""The source-model service: instances in -> InsEmbs and SIF codes stored -> stream entries out."""
