# misspelt_gate_in_choice.kt: a typo hidden among the options of a choice
# expect: E202
graph misspelt_gate_in_choice
data digits { val_split = 300 }
node a : cnn_tiny [target]
edges * -> * : choice(through, cutof, linear)
