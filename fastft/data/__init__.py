"""fastft.data: SQuAD and generic SFT formatting, tokenization, packing, collators, SQuAD eval."""
