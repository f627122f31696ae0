# misspelt_gate.kt: a gate name with a typo
# expect: E202
graph misspelt_gate
data digits { val_split = 300 }
node a : cnn_tiny [target]
label -> a : thruogh
