#!/bin/sh
# Debian's wordnet-base (WordNet 3.0's database files in /usr/share/wordnet) for the synonyms of r1kit's EDA
# augmentation (r1kit augment, the augment: section of a training recipe; tests/test_augment.py), read offline by
# nltk's WordNetCorpusReader. A no-op when the database is there; otherwise scripts/apt_install.sh. Without it the
# WordNet tests skip and synonym replacement / insertion stop with an error naming this script.
if [ -f /usr/share/wordnet/data.noun ] && [ -f /usr/share/wordnet/index.noun ]; then
    exit 0
fi
exec sh "$(dirname "$0")/apt_install.sh" "the WordNet augmentation tests" wordnet-base
